"""Object storage behind one URI: a local directory (the embedded default) or `s3://bucket/prefix`.

`Store(root)` is the one interface; it is a `LocalStore` or an `S3Store` by the root's scheme, and no module
outside this one knows which (nor reads a backend's paths, clients or keys).

Versioned paths are write-once: `put` refuses to replace an object (local: an atomic hard link that
fails if the name exists; S3: a conditional write with `IfNoneMatch='*'`, answered 412 on overwrite).
Scratch data that a retried task may rewrite goes through `put(..., overwrite=True)` explicitly.

S3 credentials: the `ftops` CLI reads the environment (AWS_* variables, boto3's default chain). Under Airflow,
with FTOPS_AWS_CONN_ID set (e.g. `aws_default`), they come from that Airflow connection through the amazon
provider's hook, so operators manage them in Airflow's UI or secrets backend; Airflow is imported only then.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

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


def adapter_prefix(customer: str, base_slug: str, adapter_version: str) -> str:
    """Where an adapter version lives in object storage: `<customer>/adapters/<base>/<version>` (write-once)."""
    return f"{customer}/adapters/{base_slug}/{adapter_version}"


class AlreadyExists(FileExistsError):
    """A write-once object exists already; nothing was changed."""


class StaleTry(RuntimeError):
    """A later try of the same task has taken over: this try may no longer write (its write was refused)."""


class Fence:
    """A task try's right to write: the object at `key` names the try that holds it (`claim`), and a write goes
    through only while it still names this one (`check`). Airflow retries a task whose worker went silent, but
    cannot stop the lost try's process if it is still alive somewhere (its supervisor killed, its machine cut
    off): the fence keeps such an orphan from writing over the retry's work.

    The check reads one small object before each write; a write that began before the retry claimed may still
    finish (one write's window). A record that does not parse holds for nobody: writes are refused."""

    def __init__(self, store: Store, key: str, try_number: int, label: str = ""):
        self.store, self.key, self.try_number, self.label = store, key, int(try_number), label or key

    def holder(self) -> int | None:
        """The try that holds the fence; None if none has claimed it. Unreadable storage raises."""
        import json

        try:
            raw = self.store.get(self.key)
        except FileNotFoundError:
            return None
        try:
            return int(json.loads(raw)["try"])
        except (ValueError, KeyError, TypeError):
            return -1  # not a record of ours: nobody holds it, and nobody may write until a try claims it

    def claim(self) -> None:
        """Take the fence for this try (at its start). A try older than the holder is stale already."""
        import json
        import socket
        from datetime import UTC, datetime

        if (held := self.holder()) is not None and held > self.try_number:
            self.refuse(held, f"claim {self.key}")
        record = {"try": self.try_number, "host": socket.gethostname(), "pid": os.getpid()}
        record["at"] = datetime.now(UTC).isoformat()
        self.store.put(self.key, json.dumps(record).encode(), overwrite=True)

    def check(self, what: str) -> None:
        """Raise StaleTry (and leave a record of the refusal) unless this try holds the fence."""
        if (held := self.holder()) != self.try_number:
            self.refuse(held, what)

    def refuse(self, held: int | None, what: str) -> None:
        import logging

        msg = f"{self.label}: try {self.try_number} is stale (the fence names try {held}); refused to write {what}"
        logging.getLogger("ftops.fence").error(msg)
        try:  # the orphan's log may go nowhere (its supervisor is gone): the refusal is kept beside the fence
            self.store.put(f"{self.key}.refused-{self.try_number}", msg.encode(), overwrite=True)
        except Exception:  # noqa: BLE001 - the refusal stands whether or not its record could be written
            pass
        raise StaleTry(msg)


class Fenced:
    """A store whose writes go through only while `fence` holds (reads pass through unchanged)."""

    def __init__(self, store: Store, fence: Fence):
        self._store, self.fence = store, fence

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def put(self, key: str, data: bytes, overwrite: bool = False) -> str:
        self.fence.check(key)
        return self._store.put(key, data, overwrite)

    def put_file(self, key: str, path: str | Path, overwrite: bool = False) -> str:
        self.fence.check(key)
        return self._store.put_file(key, path, overwrite)

    def delete_prefix(self, prefix: str) -> int:
        self.fence.check(f"(removal) {prefix}")
        return self._store.delete_prefix(prefix)

    def upload_dir(self, local_dir: str | Path, prefix: str) -> str:
        return Store.upload_dir(self, local_dir, prefix)  # type: ignore[arg-type]  # every file through `put`


@dataclass
class Entry:
    """An object found by `Store.entries`: its key, how to open it, and why it is refused (`symlink`), if it is."""

    key: str
    open: Callable[[], IO[bytes]]
    refused: str = ""
    folder: bool = False  # a refused entry that is a folder (a symlinked directory)
    token: str = ""  # changes when the object does (as in `list_info`)


class Store:
    """A bucket-like view of a storage root; keys are '/'-separated relative paths."""

    def __new__(cls, root: str):
        if cls is Store:
            cls = S3Store if root.rstrip("/").startswith("s3://") else LocalStore
        return super().__new__(cls)

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    # What a backend provides.
    def put(self, key: str, data: bytes, overwrite: bool = False) -> str:
        """Write an object; write-once unless `overwrite` (AlreadyExists if the key is taken)."""
        raise NotImplementedError

    def put_file(self, key: str, path: str | Path, overwrite: bool = False) -> str:
        """`put` from a local file, streamed (large dataset files are never held in memory)."""
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def open(self, key: str) -> IO[bytes]:
        """A binary stream of an object (read in chunks: constant memory whatever its size)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list_info(self, prefix: str) -> dict[str, str]:
        """Keys under a prefix (recursive), each with a token that changes when the object does (S3: the
        ETag and size; local: size and mtime): enough to tell what to re-read without reading it."""
        raise NotImplementedError

    def children(self, prefix: str) -> list[str]:
        """Names directly under a prefix (one level, like `ls`), sorted; no object is read."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under a prefix (or the object of that key): a run's scratch, or what a crashed
        try left of its own unpublished version (no manifest). Never a published version."""
        raise NotImplementedError

    def entries(self, prefix: str) -> Iterator[Entry]:
        """Every object under a prefix with a way to open it; on local disk symlinks are listed refused and never
        followed (a link could point at any file on the host), and a file swapped for one is not opened."""
        raise NotImplementedError

    def read_npy(self, key: str) -> np.ndarray:
        """An `.npy` object; memory-mapped where the backend allows it (paged in as read: flat memory)."""
        import numpy as np

        return np.load(io.BytesIO(self.get(key)))

    # Built on the above.
    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix (recursive), sorted."""
        return sorted(self.list_info(prefix))

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
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local_dir.parent, prefix=".partial-"))
        try:
            self._copy_out(prefix.strip("/"), tmp)
            os.rename(tmp, local_dir)
        except BaseException:  # S3 gone mid-copy raises botocore's errors, not OSError: never leave a partial
            shutil.rmtree(tmp, ignore_errors=True)
            if not local_dir.exists():  # else a concurrent copy finished first: it is complete, use it
                raise
        return local_dir

    def _copy_out(self, prefix: str, dest: Path) -> None:
        keys = self.list(prefix)
        if not keys:
            raise FileNotFoundError(self.uri(prefix))
        for key in keys:
            out = dest / key[len(prefix) + 1 :]
            out.parent.mkdir(parents=True, exist_ok=True)
            with self.open(key) as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)


class LocalStore(Store):
    """A folder on local disk (the embedded default): writes appear whole or not at all."""

    def __init__(self, root: str):
        super().__init__(root)
        self._base = Path(self.root.removeprefix("file://"))

    def put(self, key: str, data: bytes, overwrite: bool = False) -> str:
        return self._publish(key, overwrite, lambda tmp: Path(tmp).write_bytes(data))

    def put_file(self, key: str, path: str | Path, overwrite: bool = False) -> str:
        def fill(tmp: str) -> None:
            os.unlink(tmp)
            try:  # same filesystem (a spill folder beside the store): a link, not a copy of a large file
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)

        return self._publish(key, overwrite, fill)

    def _publish(self, key: str, overwrite: bool, fill) -> str:
        """`fill` writes a temporary file beside the object, which then replaces it (`overwrite`) or is
        hard-linked to its name, which fails if the name is taken."""
        dest = self._base / key
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

    def get(self, key: str) -> bytes:
        return (self._base / key).read_bytes()

    def open(self, key: str) -> IO[bytes]:
        return (self._base / key).open("rb")

    def exists(self, key: str) -> bool:
        return (self._base / key).is_file()

    def list(self, prefix: str) -> list[str]:
        top = self._base / prefix.strip("/")
        if not top.is_dir():
            return []
        return sorted(
            p.relative_to(self._base).as_posix()
            for p in top.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def list_info(self, prefix: str) -> dict[str, str]:
        out = {}
        for key in self.list(prefix):
            st = (self._base / key).stat()
            out[key] = f"{st.st_size}-{st.st_mtime_ns}"
        return out

    def children(self, prefix: str) -> list[str]:
        top = self._base / prefix.strip("/")
        return sorted(p.name for p in top.iterdir() if not p.name.startswith(".tmp-")) if top.is_dir() else []

    def delete_prefix(self, prefix: str) -> int:
        path = self._base / prefix.strip("/")
        if path.is_file():
            path.unlink()
            return 1
        keys = self.list(prefix)
        shutil.rmtree(path, ignore_errors=True)
        return len(keys)

    def entries(self, prefix: str) -> Iterator[Entry]:
        base = self._base / prefix.strip("/")
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            here = Path(dirpath)
            for d in sorted(dirnames):
                if (here / d).is_symlink():
                    rel = (here / d).relative_to(base).as_posix()
                    yield Entry(rel, lambda: io.BytesIO(), refused="symlink", folder=True)
            dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink())
            for fn in sorted(filenames):
                path = here / fn
                if fn.startswith(".tmp-"):
                    continue
                rel = path.relative_to(base).as_posix()
                if path.is_symlink():
                    yield Entry(rel, lambda: io.BytesIO(), refused="symlink")
                elif path.is_file():
                    st = path.stat()
                    yield Entry(rel, no_follow(path), token=f"{st.st_size}-{st.st_mtime_ns}")

    def read_npy(self, key: str) -> np.ndarray:
        import numpy as np

        return np.load(self._base / key, mmap_mode="r")

    def _copy_out(self, prefix: str, dest: Path) -> None:
        src = self._base / prefix
        if not src.is_dir():
            raise FileNotFoundError(self.uri(prefix))
        shutil.copytree(src, dest, dirs_exist_ok=True)


def no_follow(path: Path) -> Callable[[], IO[bytes]]:
    """An opener of a local file that refuses it if it has become a symlink since it was listed."""

    def open_no_follow() -> IO[bytes]:
        # O_NOFOLLOW: a file swapped for a symlink between listing and reading is refused, not followed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return os.fdopen(fd, "rb")

    return open_no_follow


class S3Store(Store):
    """An `s3://bucket/prefix` (AWS or any S3-compatible server: `AWS_ENDPOINT_URL`); write-once by conditional
    writes."""

    def __init__(self, root: str):
        import boto3

        super().__init__(root)
        bucket, _, prefix = self.root[len("s3://") :].partition("/")
        self._bucket, self._prefix = bucket, prefix.strip("/")
        self._s3 = s3_client() if os.environ.get(CONN_ENV) else boto3.client("s3")

    def _key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    def put(self, key: str, data: bytes, overwrite: bool = False) -> str:
        return self._put(key, data, overwrite)

    def put_file(self, key: str, path: str | Path, overwrite: bool = False) -> str:
        with open(path, "rb") as f:
            return self._put(key, f, overwrite)

    def _put(self, key: str, body, overwrite: bool) -> str:
        extra = {} if overwrite else {"IfNoneMatch": "*"}  # S3's conditional write: never replace an object
        try:
            self._s3.put_object(Bucket=self._bucket, Key=self._key(key), Body=body, **extra)
        except self._s3.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise AlreadyExists(self.uri(key)) from exc
            raise
        return self.uri(key)

    def get(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def open(self, key: str) -> IO[bytes]:
        try:
            return self._s3.get_object(Bucket=self._bucket, Key=self._key(key))["Body"]
        except self._s3.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(self.uri(key)) from exc

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self._bucket, Key=self._key(key))
            return True
        except self._s3.exceptions.ClientError:
            return False

    def _pages(self, prefix: str, **kwargs):
        """Pages of `list_objects_v2` under a prefix of ours, and the full S3 prefix they start with."""
        full = self._key(prefix) + "/" if prefix else (self._prefix + "/" if self._prefix else "")
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=full, **kwargs)
        return full, pages

    def _objects(self, prefix: str):
        """(key, object) for every object under a prefix, keys relative to our root."""
        _, pages = self._pages(prefix)
        for page in pages:
            for o in page.get("Contents", []):
                yield o["Key"][len(self._key("")) :].lstrip("/"), o

    def list_info(self, prefix: str) -> dict[str, str]:
        return {key: f"{o['Size']}-{o['ETag']}" for key, o in self._objects(prefix.strip("/"))}

    def children(self, prefix: str) -> list[str]:
        full, pages = self._pages(prefix.strip("/"), Delimiter="/")
        names: set[str] = set()
        for page in pages:
            names |= {c["Prefix"][len(full) :].strip("/") for c in page.get("CommonPrefixes", [])}
            names |= {o["Key"][len(full) :] for o in page.get("Contents", [])}
        return sorted(names)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        if self.exists(prefix.strip("/")):
            keys = sorted(set(keys) | {prefix.strip("/")})
        for i in range(0, len(keys), 1000):
            self._s3.delete_objects(
                Bucket=self._bucket, Delete={"Objects": [{"Key": self._key(k)} for k in keys[i : i + 1000]]}
            )
        return len(keys)

    def entries(self, prefix: str) -> Iterator[Entry]:
        base = prefix.strip("/")
        for key, o in sorted(self._objects(base)):
            rel = key[len(base) + 1 :] if base else key
            yield Entry(rel, lambda key=key: self.open(key), token=f"{o['Size']}-{o['ETag']}")
