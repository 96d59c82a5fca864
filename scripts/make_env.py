#!/usr/bin/env python3
"""Write a fresh `.env` for docker-compose.yaml, and the secret files it mounts, with random secrets:

    .venv/bin/python scripts/make_env.py [--out DIR] [--customers include/customers.yaml] [--force]

DIR (default: the repository root) receives `.env` and `secrets/`: `s3.json` (SeaweedFS identities per role,
ftops.operate.identities), `mlflow_auth.ini` (MLflow basic-auth: service user `ftops`, read-only default), and
`customer_upload_keys.json` (each customer's S3 upload key, to hand over). Every file is mode 0600 and
nothing is printed but their paths. An existing `.env` is kept unless --force (rotating secrets of a running
stack needs care: database passwords are set at first start).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))
from ftops.operate.identities import Credentials, mlflow_auth_ini, s3_config  # noqa: E402


def write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT)
    ap.add_argument("--customers", type=Path, default=ROOT / "include" / "customers.yaml")
    ap.add_argument("--force", action="store_true", help="overwrite an existing .env")
    a = ap.parse_args()
    env_file = a.out / ".env"
    if env_file.exists() and not a.force:
        sys.exit(f"{env_file} exists; keep it, or pass --force to replace every secret")
    customers = [c["id"] for c in (yaml.safe_load(a.customers.read_text()) or {}).get("customers", [])]

    def token() -> str:
        return secrets.token_urlsafe(32)

    admin, pipeline, vllm = Credentials.new("ADM"), Credentials.new("PIPE"), Credentials.new("VLLM")
    uploads = {c: Credentials.new("UP") for c in customers}
    mlflow_password = token()
    values = {
        "AIRFLOW_DB_PASSWORD": token(),
        "MLFLOW_DB_PASSWORD": token(),
        # Fernet wants 32 url-safe base64-encoded bytes.
        "AIRFLOW_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "AIRFLOW_JWT_SECRET": token(),
        "AIRFLOW_API_SECRET_KEY": token(),
        "FTOPS_AIRFLOW_ADMIN_PASSWORD": token(),
        "FTOPS_AIRFLOW_API_PASSWORD": token(),
        "FTOPS_S3_ADMIN_ACCESS_KEY": admin.access_key,
        "FTOPS_S3_ADMIN_SECRET_KEY": admin.secret_key,
        "FTOPS_S3_ACCESS_KEY": pipeline.access_key,
        "FTOPS_S3_SECRET_KEY": pipeline.secret_key,
        "FTOPS_S3_VLLM_ACCESS_KEY": vllm.access_key,
        "FTOPS_S3_VLLM_SECRET_KEY": vllm.secret_key,
        "FTOPS_MLFLOW_PASSWORD": mlflow_password,
        "MLFLOW_FLASK_SECRET_KEY": token(),
        "FTOPS_SERVING_ADMIN_KEY": "ftadm_" + token(),
        "REDIS_PASSWORD": token(),
    }
    secrets_dir = a.out / "secrets"
    write_secret(secrets_dir / "s3.json", json.dumps(s3_config(admin, pipeline, vllm, uploads), indent=1))
    write_secret(
        secrets_dir / "mlflow_auth.ini", mlflow_auth_ini(mlflow_password, "sqlite:////mlflow-auth/basic_auth.db")
    )
    write_secret(
        secrets_dir / "customer_upload_keys.json",
        json.dumps({c: {"access_key": k.access_key, "secret_key": k.secret_key} for c, k in uploads.items()}, indent=1),
    )
    write_secret(env_file, "".join(f"{k}={v}\n" for k, v in values.items()))
    for p in (
        env_file,
        secrets_dir / "s3.json",
        secrets_dir / "mlflow_auth.ini",
        secrets_dir / "customer_upload_keys.json",
    ):
        print(p)


if __name__ == "__main__":
    main()
