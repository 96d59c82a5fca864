"""Registry: the MLflow model registry as the single source of truth for adapter versions.

One registered model per customer and base model. A version's tags carry its lineage (dataset version
and fingerprint, base model, LoRA config, Airflow dag/run, metrics, gate decision). Aliases, not stages:
`candidate` (latest registered), `production` (served), `previous` (what production was before the last
move, for rollback). Registration is idempotent per training run; promotion is one alias move and only
for a version whose gate passed.
"""

from __future__ import annotations

from dataclasses import dataclass

PRODUCTION, PREVIOUS, CANDIDATE = "production", "previous", "candidate"


class RegistryError(RuntimeError):
    """An unknown customer/version, or a move the rules forbid; the message says which."""


def model_name(customer: str, base_slug: str) -> str:
    return f"ftops-{customer}-{base_slug}"


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
                raise
        existing = self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
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

        try:
            return _wrap(customer, self.client.get_model_version(model_name(customer, base_slug), version))
        except MlflowException as exc:
            raise RegistryError(f"{customer}: no adapter version {version!r} on {base_slug}") from exc

    def by_alias(self, customer: str, base_slug: str, alias: str) -> AdapterVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            return _wrap(customer, self.client.get_model_version_by_alias(model_name(customer, base_slug), alias))
        except MlflowException as exc:
            # No such model or alias: None. Anything else (a refused login, a server error) must not read as
            # "no production version": the reconciler would unload the customer's adapter.
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise RegistryError(
                f"{customer}: the registry did not answer for alias {alias!r}: {exc.error_code}"
            ) from exc

    def versions(self, customer: str, base_slug: str) -> list[AdapterVersion]:
        found = self.client.search_model_versions(f"name='{model_name(customer, base_slug)}'")
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
