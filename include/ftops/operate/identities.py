"""Least-privilege S3 identities for SeaweedFS (its `s3.json`, `weed ... -s3.config=FILE`), one per role:

- `admin`: creates buckets and sets versioning (the s3-init job only);
- `pipeline`: Airflow tasks and MLflow: read, write, list and tag the data bucket and MLflow's bucket;
- `vllm`: read-only, adapters only (`<bucket>/*/adapters/*`), for replicas that pull adapters themselves;
- `upload-<customer>`: write-only to that customer's own inbox prefix (`<bucket>/<customer>/inbox/*`): it
  cannot list, read or write another customer's inbox, any dataset or any adapter (its own uploads included:
  a leaked upload key reveals nothing).

SeaweedFS matches `Action:bucket/path` grants with `*` wildcards; a grant without one is bucket-wide. Tested on
the real server in tests/test_storage_identities.py.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_CUSTOMER = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str

    @classmethod
    def new(cls, prefix: str) -> Credentials:
        return cls(f"{prefix}{secrets.token_hex(8)}".upper()[:20], secrets.token_urlsafe(30))


def _identity(name: str, creds: Credentials, actions: list[str]) -> dict:
    return {
        "name": name,
        "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
        "actions": actions,
    }


def s3_config(
    admin: Credentials,
    pipeline: Credentials,
    vllm: Credentials,
    customers: dict[str, Credentials],
    bucket: str = "ftops",
    mlflow_bucket: str = "mlflow",
) -> dict:
    """The `s3.json` document; `customers` maps a customer id to its upload credentials."""
    identities = [
        _identity("admin", admin, ["Admin", "Read", "List", "Tagging", "Write"]),
        _identity(
            "pipeline",
            pipeline,
            [f"{a}:{b}" for b in (bucket, mlflow_bucket) for a in ("Read", "Write", "List", "Tagging")],
        ),
        _identity("vllm", vllm, [f"Read:{bucket}/*/adapters/*"]),
    ]
    for customer, creds in sorted(customers.items()):
        if not _CUSTOMER.match(customer):
            raise ValueError(f"invalid customer id {customer!r}")
        identities.append(_identity(f"upload-{customer}", creds, [f"Write:{bucket}/{customer}/inbox/*"]))
    return {"identities": identities}


def mlflow_auth_ini(service_password: str, database_uri: str, default_permission: str = "READ") -> str:
    """MLflow's basic-auth config (`MLFLOW_AUTH_CONFIG_PATH`): the platform's service user `ftops` is its admin,
    so only it sets aliases and tags; every other user (operators) gets `default_permission`, READ: they see
    every model and run but change none. The user database lives at `database_uri`."""
    if "\n" in service_password or "%" in service_password:
        raise ValueError("the MLflow password must not contain newlines or % (configparser interpolation)")
    return (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri}\n"
        "admin_username = ftops\n"
        f"admin_password = {service_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
