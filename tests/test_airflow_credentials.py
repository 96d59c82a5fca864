"""S3 credentials the Airflow way: with FTOPS_AWS_CONN_ID set, storage takes its keys and endpoint from that Airflow
connection (here defined as an AIRFLOW_CONN_* variable, as a secrets backend would serve it), not from the AWS_*
environment; the `ftops` stage commands a task starts get them as their own AWS_* variables. Against the real
SeaweedFS S3 server, which checks signatures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ftops.storage import Store, subprocess_env

AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN")


def connection(url: str, secret: str) -> str:
    extra = {"endpoint_url": url, "region_name": "us-east-1"}
    return json.dumps({"conn_type": "aws", "login": "ftops", "password": secret, "extra": extra})


@pytest.fixture
def airflow_only(s3_server, monkeypatch):
    """The task's environment: no AWS_* credentials, only the connection's name and the connection."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FTOPS_AWS_CONN_ID", "ftops_s3")
    monkeypatch.setenv("AIRFLOW_CONN_FTOPS_S3", connection(s3_server.url, "ftops-secret"))
    return monkeypatch


def test_store_uses_the_airflow_connection(airflow_only):
    store = Store("s3://ftops/conn-test")
    store.put("a/b.txt", b"hello", overwrite=True)
    assert store.get("a/b.txt") == b"hello"


def test_a_wrong_secret_in_the_connection_is_refused_although_the_environment_has_the_right_one(
    airflow_only, s3_server
):
    airflow_only.setenv("AIRFLOW_CONN_FTOPS_S3", connection(s3_server.url, "not-the-secret"))
    airflow_only.setenv("AWS_ACCESS_KEY_ID", "ftops")
    airflow_only.setenv("AWS_SECRET_ACCESS_KEY", "ftops-secret")
    airflow_only.setenv("AWS_ENDPOINT_URL", s3_server.url)
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        Store("s3://ftops/conn-test").put("x.txt", b"x", overwrite=True)


def test_stage_commands_get_the_connection_as_their_own_environment(airflow_only, s3_server):
    env = subprocess_env()
    assert "FTOPS_AWS_CONN_ID" not in env and env["AWS_ENDPOINT_URL"] == s3_server.url
    code = "from ftops.storage import Store; Store('s3://ftops/conn-test').put('child.txt', b'c', overwrite=True)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert Store("s3://ftops/conn-test").get("child.txt") == b"c"


def test_without_the_setting_the_cli_keeps_the_environment(s3_server, monkeypatch):
    monkeypatch.delenv("FTOPS_AWS_CONN_ID", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_FTOPS_S3", connection(s3_server.url, "not-the-secret"))
    assert subprocess_env()["AWS_SECRET_ACCESS_KEY"] == "ftops-secret"
    Store("s3://ftops/conn-test").put("env.txt", b"e", overwrite=True)
