"""Object storage behind one URI: a local directory (the embedded default) or `s3://bucket/prefix`.

Versioned paths are write-once: `put` refuses to replace an object (local: an atomic hard link that
fails if the name exists; S3: a conditional write with `IfNoneMatch='*'`, answered 412 on overwrite).
Scratch data that a retried task may rewrite goes through `put(..., overwrite=True)` explicitly.

S3 credentials: the `ftops` CLI reads the environment (AWS_* variables, boto3's default chain). Under Airflow,
with FTOPS_AWS_CONN_ID set (e.g. `aws_default`), they come from that Airflow connection through the amazon
provider's hook, so operators manage them in Airflow's UI or secrets backend; Airflow is imported only then.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CONN_ENV = "FTOPS_AWS_CONN_ID"


def _aws_hook():
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(aws_conn_id=os.environ[CONN_ENV], client_type="s3")


def s3_client():
    """An S3 client from the Airflow connection named by FTOPS_AWS_CONN_ID (keys, region, endpoint, role)."""
    return _aws_hook().get_client_type("s3")


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an `ftops` stage command started by a task. With FTOPS_AWS_CONN_ID set, the
    connection is resolved here, in the task (a child process cannot reach Airflow's connections through the
    task's API channel), and handed down as AWS_* variables of the child only: never written or logged."""
    env = dict(os.environ if env is None else env)
    if not env.get(CONN_ENV):
        return env
    hook = _aws_hook()
    creds = hook.get_credentials()
    env.pop(CONN_ENV)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    env |= {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key}
    if creds.token:
        env["AWS_SESSION_TOKEN"] = creds.token
    if endpoint := hook.conn_config.get_service_endpoint_url("s3"):
        env["AWS_ENDPOINT_URL"] = endpoint
    if hook.conn_region_name:
        env["AWS_DEFAULT_REGION"] = hook.conn_region_name
    return env


class AlreadyExists(FileExistsError):
    """A write-once object exists already; nothing was changed."""


class Store:
    """A bucket-like view of a storage root; keys are '/'-separated relative paths."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.is_s3 = self.root.startswith("s3://")
        if self.is_s3:
            import boto3

            bucket, _, prefix = self.root[len("s3://") :].partition("/")
            self.bucket, self.prefix = bucket, prefix.strip("/")
            self.s3 = s3_client() if os.environ.get(CONN_ENV) else boto3.client("s3")
        else:
            self.base = Path(self.root.removeprefix("file://"))

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _s3key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, overwrite: bool = False) -> str:
        """Write an object; write-once unless `overwrite` (AlreadyExists if the key is taken)."""
        if self.is_s3:
            return self._put_s3(key, data, overwrite)
        return self._publish(key, overwrite, lambda tmp: Path(tmp).write_bytes(data))

    def get(self, key: str) -> bytes:
        if self.is_s3:
            try:
                return self.s3.get_object(Bucket=self.bucket, Key=self._s3key(key))["Body"].read()
            except self.s3.exceptions.NoSuchKey as exc:
                raise FileNotFoundError(self.uri(key)) from exc
        return (self.base / key).read_bytes()

    def open(self, key: str):
        """A binary stream of an object (read in chunks: constant memory whatever its size)."""
        if self.is_s3:
            try:
                return self.s3.get_object(Bucket=self.bucket, Key=self._s3key(key))["Body"]
            except self.s3.exceptions.NoSuchKey as exc:
                raise FileNotFoundError(self.uri(key)) from exc
        return (self.base / key).open("rb")

    def put_file(self, key: str, path: str | Path, overwrite: bool = False) -> str:
        """`put` from a local file, streamed (large dataset files are never held in memory)."""
        if self.is_s3:
            with open(path, "rb") as f:
                return self._put_s3(key, f, overwrite)

        def fill(tmp: str) -> None:
            os.unlink(tmp)
            try:  # same filesystem (a spill folder beside the store): a link, not a copy of a large file
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)

        return self._publish(key, overwrite, fill)

    def _put_s3(self, key: str, body, overwrite: bool) -> str:
        extra = {} if overwrite else {"IfNoneMatch": "*"}  # S3's conditional write: never replace an object
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self._s3key(key), Body=body, **extra)
        except self.s3.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise AlreadyExists(self.uri(key)) from exc
            raise
        return self.uri(key)

    def _publish(self, key: str, overwrite: bool, fill) -> str:
        """A local object appears whole or not at all: `fill` writes a temporary file beside it, which then
        replaces the object (`overwrite`) or is hard-linked to its name, which fails if the name is taken."""
        dest = self.base / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        os.close(fd)
        try:
            fill(tmp)
            if overwrite:
                os.replace(tmp, dest)
            else:
                try:
                    os.link(tmp, dest)
                except FileExistsError as exc:
                    raise AlreadyExists(self.uri(key)) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.uri(key)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under a prefix: a run's scratch, or what a crashed try left of its own unpublished
        version (no manifest). Never a published version."""
        keys = self.list(prefix)
        if self.is_s3:
            for i in range(0, len(keys), 1000):
                self.s3.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self._s3key(k)} for k in keys[i : i + 1000]]}
                )
        else:
            shutil.rmtree(self.base / prefix.strip("/"), ignore_errors=True)
        return len(keys)

    def exists(self, key: str) -> bool:
        if self.is_s3:
            try:
                self.s3.head_object(Bucket=self.bucket, Key=self._s3key(key))
                return True
            except self.s3.exceptions.ClientError:
                return False
        return (self.base / key).is_file()

    def _s3_pages(self, prefix: str, **kwargs):
        """Pages of `list_objects_v2` under a prefix of ours, and the full S3 prefix they start with."""
        full = self._s3key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full, **kwargs)
        return full, pages

    def _s3_objects(self, prefix: str):
        """(key, object) for every object under a prefix, keys relative to our root."""
        _, pages = self._s3_pages(prefix)
        for page in pages:
            for o in page.get("Contents", []):
                yield o["Key"][len(self._s3key("")) :].lstrip("/"), o

    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix (recursive), sorted."""
        prefix = prefix.strip("/")
        if self.is_s3:
            return sorted(key for key, _ in self._s3_objects(prefix))
        top = self.base / prefix
        if not top.is_dir():
            return []
        return sorted(
            p.relative_to(self.base).as_posix()
            for p in top.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def list_info(self, prefix: str) -> dict[str, str]:
        """Keys under a prefix (recursive), each with a token that changes when the object does (S3: the
        ETag and size; local: size and mtime): enough to tell what to re-read without reading it."""
        prefix = prefix.strip("/")
        if self.is_s3:
            return {key: f"{o['Size']}-{o['ETag']}" for key, o in self._s3_objects(prefix)}
        out = {}
        for key in self.list(prefix):
            st = (self.base / key).stat()
            out[key] = f"{st.st_size}-{st.st_mtime_ns}"
        return out

    def children(self, prefix: str) -> list[str]:
        """Names directly under a prefix (one level, like `ls`), sorted; no object is read."""
        prefix = prefix.strip("/")
        if self.is_s3:
            full, pages = self._s3_pages(prefix, Delimiter="/")
            names: set[str] = set()
            for page in pages:
                names |= {c["Prefix"][len(full) :].strip("/") for c in page.get("CommonPrefixes", [])}
                names |= {o["Key"][len(full) :] for o in page.get("Contents", [])}
            return sorted(names)
        top = self.base / prefix
        return sorted(p.name for p in top.iterdir() if not p.name.startswith(".tmp-")) if top.is_dir() else []

    def upload_dir(self, local_dir: str | Path, prefix: str) -> str:
        """Copy a folder to a write-once prefix. Re-uploading identical files (a retried task finishing an
        interrupted upload) is a no-op; any different content already there raises AlreadyExists."""
        for path in sorted(Path(local_dir).rglob("*")):
            if not path.is_file():
                continue
            key, data = f"{prefix}/{path.relative_to(local_dir).as_posix()}", path.read_bytes()
            try:
                self.put(key, data)
            except AlreadyExists:
                if self.get(key) != data:
                    raise
        extra = set(self.list(prefix)) - {
            f"{prefix}/{p.relative_to(local_dir).as_posix()}" for p in Path(local_dir).rglob("*") if p.is_file()
        }
        if extra:
            raise AlreadyExists(f"{self.uri(prefix)} holds other files: {sorted(extra)[:3]}")
        return self.uri(prefix)

    def download_dir(self, prefix: str, local_dir: str | Path) -> Path:
        """Copy a prefix to a local folder atomically: the folder appears complete or not at all."""
        local_dir = Path(local_dir)
        if local_dir.exists():
            return local_dir
        src = self.base / prefix if not self.is_s3 and (self.base / prefix).is_dir() else None
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local_dir.parent, prefix=".partial-"))
        try:
            if src is not None:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            else:
                keys = self.list(prefix)
                if not keys:
                    raise FileNotFoundError(self.uri(prefix))
                for key in keys:
                    dest = tmp / key[len(prefix.strip("/")) + 1 :]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(self.get(key))
            os.rename(tmp, local_dir)
        except BaseException:  # S3 gone mid-copy raises botocore's errors, not OSError: never leave a partial
            shutil.rmtree(tmp, ignore_errors=True)
            if not local_dir.exists():  # else a concurrent copy finished first: it is complete, use it
                raise
        return local_dir
