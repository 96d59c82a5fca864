"""Registry: the MLflow model registry as the single source of truth for adapter versions.

One registered model per customer and base model. A version's tags carry its lineage (dataset version
and fingerprint, base model, LoRA config, Airflow dag/run, metrics, gate decision). Aliases, not stages:
`candidate` (latest registered), `production` (served), `previous` (what production was before the last
move, for rollback). Registration is idempotent per training run; promotion is one alias move and only
for a version whose gate passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ftops.config import check_base_slug, check_customer_id
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
    customer: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    source: str
    created: int

    @property
    def adapter_version(self) -> str:
        return self.tags.get("adapter.version", "")

    @property
    def adapter_prefix(self) -> str:
        return self.tags.get("adapter.prefix", "")

    def checked(self, base_slug: str) -> AdapterVersion:
        """This version if its adapter values are what the platform itself would have written: a plain
        version name, the customer's own adapter prefix for that exact version, a sha256; else
        UntrustedVersion. Whatever copies or loads an adapter goes through here first."""
        label = f"{self.customer}: registry version {self.version}"
        av, prefix, sha = self.adapter_version, self.adapter_prefix, self.tags.get("adapter.sha256", "")
        if not ADAPTER_VERSION_RE.fullmatch(av) or ".." in av:
            raise UntrustedVersion(f"{label}: refused: adapter.version {av[:80]!r} is not a plain version name")
        expected = adapter_prefix(self.customer, base_slug, av)
        if prefix != expected:
            raise UntrustedVersion(f"{label}: refused: adapter.prefix {prefix[:120]!r} is not {expected!r}")
        if not SHA256_RE.fullmatch(sha):
            raise UntrustedVersion(f"{label}: refused: adapter.sha256 missing or malformed")
        return self


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _wrap(customer: str, mv) -> AdapterVersion:
    return AdapterVersion(
        customer, str(mv.version), list(mv.aliases or []), dict(mv.tags or {}), mv.source, mv.creation_timestamp
    )


class Registry:
    def __init__(self, tracking_uri: str):
        self.client = _client(tracking_uri)

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
        if not force and target.tags.get("gate.decision") != "passed":
            raise RegistryError(
                f"{customer}: version {version} did not pass the gate "
                f"({target.tags.get('gate.decision', 'not evaluated')}); refusing to promote"
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
