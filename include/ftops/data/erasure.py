"""Right to erasure, the workflow: find a request's stored examples, write the tombstone, report which dataset
and adapter versions held them. Shared by `ftops data erase` and the customer API's `files.delete`."""

from __future__ import annotations

from ftops.data import snapshot as snap
from ftops.storage import Store


def erase(
    customer: str,
    *,
    match: str | None = None,
    example: str | None = None,
    source: str | None = None,
    store: Store | None = None,
    platform=None,
    mlflow_uri: str | None = None,
) -> dict:
    """Tombstone every stored example of `customer` that the request names (exactly one of `match`, `example`,
    `source`). The write-once versions stay; the tombstone keeps them out of every future training and replay.
    `adapter_versions` is None when nothing matched or the customer has no registry entry; on a registry that
    does not answer the erasure still stands and `adapter_versions_error` says the report must be retried."""
    from ftops.config import load_platform, settings

    if sum(x is not None for x in (match, example, source)) != 1:
        raise ValueError("give exactly one of match, example or source")
    env = settings()
    store = store or Store(env.storage_root)
    found = snap.find_examples(store, customer, match=match, example=example, source=source)
    ids = {i for v in found.values() for i in v}
    result: dict = {
        "customer": customer,
        "examples": len(ids),
        "dataset_versions": {v: len(i) for v, i in found.items()},
        "tombstone": None,
        "adapter_versions": None,
    }
    if not ids:
        return result
    request = next(x for x in (match, example, source) if x is not None)
    result["tombstone"] = snap.erase(store, customer, ids, request)
    platform = platform or load_platform()
    if customer in platform.customers:
        from ftops.release.registry import Registry

        try:
            versions = Registry(mlflow_uri or env.mlflow_uri).versions(
                customer, platform.customers[customer].base_model
            )
            result["adapter_versions"] = snap.adapters_containing(versions, set(found))
        except Exception as exc:  # noqa: BLE001 - the erasure stands; say what could not be checked
            result["adapter_versions_error"] = f"registry unavailable ({type(exc).__name__}): retry the report"
    return result
