"""Least-privilege S3 identities (ftops.operate.identities, the s3.json scripts/make_env.py writes) on the real
SeaweedFS server: a customer's upload key writes its own inbox and nothing else; vLLM's key reads adapters only;
the pipeline's key does the pipeline's work."""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import _free, _service
from ftops.operate.identities import Credentials, s3_config

pytestmark = pytest.mark.e2e
ROLES = ("admin", "pipeline", "vllm")


@pytest.fixture(scope="module")
def s3(home, tmp_path_factory):
    creds = {r: Credentials.new(r[:3].upper()) for r in ROLES}
    uploads = {c: Credentials.new("UP") for c in ("acme", "globex")}
    config = tmp_path_factory.mktemp("s3-identities") / "s3.json"
    config.write_text(json.dumps(s3_config(creds["admin"], creds["pipeline"], creds["vllm"], uploads)))
    port = next(p for p in range(30000, 40000, 10) if all(_free(p + i) and _free(p + i + 10000) for i in range(6)))
    admin = {"AWS_ACCESS_KEY_ID": creds["admin"].access_key, "AWS_SECRET_ACCESS_KEY": creds["admin"].secret_key}
    for svc in _service("s3", admin | {"S3_CONFIG": str(config), "S3_BUCKETS": "ftops,mlflow"}, "S3_PORT", port):

        def client(c: Credentials, url: str = svc.url):
            return boto3.client(
                "s3",
                endpoint_url=url,
                aws_access_key_id=c.access_key,
                aws_secret_access_key=c.secret_key,
                region_name="us-east-1",
                config=Config(retries={"max_attempts": 1}),
            )

        clients = {r: client(c) for r, c in creds.items()} | {f"upload-{c}": client(k) for c, k in uploads.items()}
        for bucket in ("ftops", "mlflow"):  # what compose's s3-init does with the admin identity
            try:  # `weed -bucket` may have made it already, a moment after the server reported healthy
                clients["admin"].create_bucket(Bucket=bucket)
            except ClientError as exc:
                assert exc.response["Error"]["Code"] in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}, exc
        pipe = clients["pipeline"]
        for key in (
            "acme/datasets/v1/train.jsonl",
            "acme/adapters/tiny/v1/adapter_model.safetensors",
            "globex/inbox/batch-0.jsonl",
            "globex/datasets/v1/train.jsonl",
        ):
            pipe.put_object(Bucket="ftops", Key=key, Body=b"{}\n")
        yield clients


def allowed(call) -> bool:
    try:
        call()
        return True
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in {"AccessDenied", "InvalidRequest", "SignatureDoesNotMatch"}, exc
        return False


def test_customer_upload_key_writes_only_its_own_inbox(s3):
    acme = s3["upload-acme"]
    assert allowed(lambda: acme.put_object(Bucket="ftops", Key="acme/inbox/batch-1.jsonl", Body=b"{}\n"))
    denied = {
        "list the bucket": lambda: acme.list_objects_v2(Bucket="ftops"),
        "list its own inbox": lambda: acme.list_objects_v2(Bucket="ftops", Prefix="acme/inbox/"),
        "list another inbox": lambda: acme.list_objects_v2(Bucket="ftops", Prefix="globex/inbox/"),
        "read another inbox": lambda: acme.get_object(Bucket="ftops", Key="globex/inbox/batch-0.jsonl"),
        "write another inbox": lambda: acme.put_object(Bucket="ftops", Key="globex/inbox/evil.jsonl", Body=b"x"),
        "read its own upload back": lambda: acme.get_object(Bucket="ftops", Key="acme/inbox/batch-1.jsonl"),
        "read a dataset": lambda: acme.get_object(Bucket="ftops", Key="acme/datasets/v1/train.jsonl"),
        "read another's dataset": lambda: acme.get_object(Bucket="ftops", Key="globex/datasets/v1/train.jsonl"),
        "write a dataset": lambda: acme.put_object(Bucket="ftops", Key="acme/datasets/v2/train.jsonl", Body=b"x"),
        "read an adapter": lambda: acme.get_object(
            Bucket="ftops", Key="acme/adapters/tiny/v1/adapter_model.safetensors"
        ),
        "write an adapter": lambda: acme.put_object(Bucket="ftops", Key="acme/adapters/tiny/v9/a", Body=b"x"),
        "write a look-alike prefix": lambda: acme.put_object(Bucket="ftops", Key="acme/inbox-x/a.jsonl", Body=b"x"),
        "climb out of its inbox": lambda: acme.put_object(Bucket="ftops", Key="acme/inbox/../datasets/v3/a", Body=b"x"),
        "delete in another inbox": lambda: acme.delete_object(Bucket="ftops", Key="globex/inbox/batch-0.jsonl"),
        "touch MLflow's bucket": lambda: acme.put_object(Bucket="mlflow", Key="acme/x", Body=b"x"),
    }
    assert [what for what, call in denied.items() if allowed(call)] == []
    assert not allowed(lambda: acme.list_buckets()) or acme.list_buckets()["Buckets"] == []  # sees no bucket
    # what the other customer's key wrote stays intact
    assert s3["pipeline"].get_object(Bucket="ftops", Key="globex/inbox/batch-0.jsonl")["Body"].read() == b"{}\n"


def test_vllm_key_reads_adapters_only(s3):
    vllm = s3["vllm"]
    assert allowed(lambda: vllm.get_object(Bucket="ftops", Key="acme/adapters/tiny/v1/adapter_model.safetensors"))
    denied = {
        "read a dataset": lambda: vllm.get_object(Bucket="ftops", Key="acme/datasets/v1/train.jsonl"),
        "read an inbox": lambda: vllm.get_object(Bucket="ftops", Key="globex/inbox/batch-0.jsonl"),
        "write an adapter": lambda: vllm.put_object(Bucket="ftops", Key="acme/adapters/tiny/v2/a", Body=b"x"),
        "delete an adapter": lambda: vllm.delete_object(
            Bucket="ftops", Key="acme/adapters/tiny/v1/adapter_model.safetensors"
        ),
    }
    assert [what for what, call in denied.items() if allowed(call)] == []


def test_pipeline_key_runs_the_pipeline_but_creates_no_bucket(s3):
    pipe = s3["pipeline"]
    keys = [o["Key"] for o in pipe.list_objects_v2(Bucket="ftops", Prefix="acme/")["Contents"]]
    assert "acme/datasets/v1/train.jsonl" in keys and "acme/inbox/batch-1.jsonl" in keys
    assert pipe.get_object(Bucket="ftops", Key="acme/inbox/batch-1.jsonl")["Body"].read() == b"{}\n"
    assert allowed(lambda: pipe.put_object(Bucket="mlflow", Key="1/artifacts/model.bin", Body=b"x"))
    assert not allowed(lambda: pipe.create_bucket(Bucket="elsewhere"))
